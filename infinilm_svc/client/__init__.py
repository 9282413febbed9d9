"""HTTP clients of the roles' APIs, shared by the roles, validate and the console (no server code)."""
