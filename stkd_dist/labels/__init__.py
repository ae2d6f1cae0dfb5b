"""Soft labels for students: which teachers, from which replicas or caches, joined to batches.

The layer between the teacher service (:mod:`stkd_dist.serving`: server, client, label cache) and
training (:mod:`stkd_dist.train`):

* :mod:`~stkd_dist.labels.teachers`: naming teachers (``--teacher``, ``--labels``), checking them
  against the student once on the driver, pinning their versions;
* :mod:`~stkd_dist.labels.replicas`: ``ray:N`` teacher replicas as Ray actors;
* :mod:`~stkd_dist.labels.sources`: the worker side, one label source per teacher (a stream or a
  cache) and the ensemble of their labels for each batch.
"""
