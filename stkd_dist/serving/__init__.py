"""Teacher soft-label service: a gRPC server streaming a teacher's outputs, its client and cache.

* :mod:`~stkd_dist.serving.label_arrays`: :class:`LabelArrays`, the one record labels travel in
  (prediction, and the optional spread and hidden states).
* :mod:`~stkd_dist.serving.codec`: tensors to bytes and back, checksums, chunking under a size limit
  (:mod:`.codec_tensors` below it, node slices in :mod:`.codec_slices`).
* :mod:`~stkd_dist.serving.teacher`: the teacher loaded from its checkpoint, batched inference.
* :mod:`~stkd_dist.serving.forward`: compute settings (device, precision, micro-batch) and the one
  micro-batched forward pass every caller shares.
* :mod:`~stkd_dist.serving.batcher`: the batching pipeline shared by all concurrent streams
  (read-ahead thread, forward thread, windows in flight computed once; :mod:`.inflight`).
* :mod:`~stkd_dist.serving.cache`: the Zarr soft-label cache, read and written row by row.
* :mod:`~stkd_dist.serving.precompute`: filling a cache in one pass (``stkd precompute-labels``;
  on Ray: :mod:`.precompute_ray`).
* :mod:`~stkd_dist.serving.requests`: validation of label requests (status codes).
* :mod:`~stkd_dist.serving.streaming`: producing the chunks of one request (cache, batcher).
* :mod:`~stkd_dist.serving.server`: the ``TeacherService`` server (``stkd serve``).
* :mod:`~stkd_dist.serving.auth`, :mod:`~stkd_dist.serving.metrics`: TLS and tokens, Prometheus.
* :mod:`~stkd_dist.serving.client`: :class:`SoftLabelClient`, used by student workers.
* :mod:`~stkd_dist.serving.discovery`: endpoint lists, DNS names and Ray actor replicas.
"""
