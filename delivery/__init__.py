"""Delivery: the outbox lanes per destination and what they send (design.md, data flow)."""
