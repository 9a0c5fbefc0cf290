"""Test support: the reference clinik server, the pytest plugin and its task factory.

This layer sits on top of everything and nothing in the library imports it (except the
demo and the CLI's ``serve`` command). :mod:`.server` stands in for the *remote*
service, so it keeps its own tiny SQL helper and never imports ``clinik_local.storage``:
the local store and the remote must not share code that could hide a contract bug.
"""
