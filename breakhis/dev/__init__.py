"""Machinery for running breakhis where no cluster or object store exists yet: the
embedded S3 server (SeaweedFS on 127.0.0.1) of ``make demo`` and the tests, and the
multi-node Ray cluster on loopback of the fault tests. Nothing in the jobs imports it."""
