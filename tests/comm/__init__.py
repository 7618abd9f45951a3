"""Tests of bmt-comm: topology, communicators, collectives, NCCL binding and watchdog, timeouts."""
