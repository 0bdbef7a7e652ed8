"""The REST and stream contract: wire types, their schema, request validation and decoding,
and the runtime selection rules."""
