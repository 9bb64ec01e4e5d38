"""The FANNY protocol core: pure, standard library plus msgspec only.

No asyncio, no sockets, no files, no clock and no randomness of its own: callers pass
``now`` (an aware UTC :class:`datetime.datetime`) and identifiers in. Shared by the client
(``fanny_tui``) and the broker (``broker``).

Modules:
    tokens     session ID / contact ID types and token crafting (paper section 3, step 4)
    expiry     expiry rounding to the deletion hour (paper section 3, step 6, footnote 3)
    messages   every wire message, typed and validated on decode
    handshake  the witness exchange over the data channel, a sans-I/O state machine (step 5)
    proximity  haversine distance and the spatial grid used by the broker (step 2-3)
    errors     the exception tree
"""
