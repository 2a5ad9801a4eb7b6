"""Fleets on one machine, on top of both sides: the research harness, never imported by the daemon or the SDK.

``fleet`` runs real ``EdgeClient`` devices in worker processes against a real aggregator and
broker and scores every round; ``lite`` is a model-less protocol device for load generators
and tests (it misbehaves on purpose when asked); ``demo`` is ``fedaigc demo``'s federation
and its pictures.
"""
