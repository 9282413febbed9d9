"""The Textual ops console: talks HTTP to the registry, routers and babysitters; imports no server role."""
