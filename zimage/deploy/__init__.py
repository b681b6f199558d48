"""Deployments of the server beyond one process: Ray Serve (docs/ray.md).

    ray_app.py        the application: the ingress (the server's own app) and its builder for `serve run`
    engine_replica.py the engine deployment: one Engine per replica, @serve.batch into generate_many
    remote_engine.py  what the ingress's worker calls instead of a local Engine; replica deaths handled there
    config.py         EngineDeployment: replicas, autoscaling, resources, batching
    ray_cli.py        run_ray(...): `zimage serve --ray`

Importing this package imports nothing heavy; ray_app imports ray.
"""
