"""Real deployment: a gRPC server and client processes running the same
experiment as the simulation engines (docs/architecture.md, engine ``grpc``).

``fedloom server`` is fedloom.runner's loop over a federated round with a :class:`RemoteEngine`;
``fedloom client`` trains with the serial engine's code on its own data. The
protocol is in deploy.proto: a header plus raw float32 chunks per update.
"""
