"""net: how the services talk: method calls over TCP (`transport.py`'s `RpcClient`, `server.py`'s `RpcServer`;
frames on a socket in `framing.py`, replies received into the caller's buffer in `reply_buffer.py`; many
calls in flight on one shared connection in `multiplexer.py` (the callers take turns reading), served
concurrently in `served_connection.py`; the wire format is `codec.py`, the handshake `auth.py`), and
`resolving.py`'s `ResolvingClient`, which follows a service to a new address (a restarted server, a new
mgmtd leader).

Contract: a transport failure raises `errors.NodeUnavailable` naming the address; a call is never
retried by this layer once its request may have reached the server (`ResolvingClient` resends only
calls that never left, were refused by a standby, or are declared idempotent).
"""
