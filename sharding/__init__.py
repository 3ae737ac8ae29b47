"""jaxseek.sharding: meshes, collectives, schedules and expert placement, in pure JAX/NumPy.

Here today: ``mesh`` (named ``pp``/``dp``/``ep`` meshes over any devices, fake CPU devices included),
``rules`` (logical axis names -> mesh axes for parameters, optimizer moments and activations: the dp,
zero1, ep and ep+zero1 rule sets), ``ep`` (DeepEP over ``shard_map``: normal, low-latency and
hierarchical node-limited dispatch/combine) and ``eplb`` (the expert-parallel load balancer). Planned, one
concept per module: ``dualpipe`` (pipeline schedules as data) and ``pipeline`` (their executor with
``ppermute``).

This is the ``sharding`` package of jaxseek (``import sharding`` resolves here after
``pip install jaxseek``), not an unrelated PyPI project of the same name.
"""
