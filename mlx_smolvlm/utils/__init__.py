"""Helpers shared by the library, the command lines and the server."""
