"""Real deployment: a gRPC server and client processes running the same
experiment as the simulation engines (docs/architecture.md, engine ``grpc``).

``fedloom server`` is fedloom.runner's loop over a federated round with a :class:`RemoteEngine`;
``fedloom client`` trains with the serial engine's code on its own data. The
protocol is in deploy.proto: a header plus raw float32 chunks per update.
"""

# In the package itself, which imports no gRPC: `fedloom client --client-id` is parsed before the missing
# gRPC is reported (fedloom.deploy.cli).
MAX_CLIENT_ID = 2**64 - 1  # the wire's client_id fields are uint64
MAX_ID_DIGITS = len(str(MAX_CLIENT_ID))


def is_client_id(text: str) -> bool:
    """ASCII digits of a uint64 only: str.isdigit also takes characters such as '²' that int() refuses,
    and int() itself raises on a string of thousands of digits."""
    return text.isascii() and text.isdigit() and len(text) <= MAX_ID_DIGITS and int(text) <= MAX_CLIENT_ID
