"""Value objects, the error tree, time and the intent rules (TTL caps included).

Imports nothing else of the broker: every other package may import it.
"""
