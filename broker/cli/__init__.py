"""Operator commands: `brokerctl`, its output formatting, `broker serve` and the dev setup writer.

May import `broker.app`, `broker.pki` and the generated code; never `broker.testing`.
"""
