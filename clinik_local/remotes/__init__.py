"""Remotes: the services a store syncs with, behind one protocol (:mod:`.base`)."""
