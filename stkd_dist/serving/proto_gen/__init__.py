"""Generated protobuf and gRPC modules of package ``stkd.v1`` (do not edit).

Regenerate after changing ``proto/``: ``python -m stkd_dist.serving.protogen``.
"""
