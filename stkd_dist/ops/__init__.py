"""Operations: Ray Jobs submission, a local multi-node Ray cluster and cluster probes.

* :mod:`stkd_dist.ops.ray_auth`: Ray token authentication for clients and cluster processes.
* :mod:`stkd_dist.ops.runtime_env`: the runtime environment ``stkd submit`` ships with a job.
* :mod:`stkd_dist.ops.jobs`: a thin wrapper of ``ray.job_submission.JobSubmissionClient``.
* :mod:`stkd_dist.ops.local_cluster`: a head and N worker raylets on one machine.
* :mod:`stkd_dist.ops.nodes`: the nodes a running cluster reports (ids, state, resources).
* :mod:`stkd_dist.ops.probe`: one Ray task pinned to every node, reporting where it ran.
"""
