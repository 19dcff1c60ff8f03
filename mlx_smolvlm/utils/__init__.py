"""Helpers shared by the command lines, the server and the library packages."""
