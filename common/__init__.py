"""Code every daemon shares: config files, addresses, metadata names, tokens,
start-up errors, the MQTT publisher and the helpers that start the daemons.

edge/ and cloud/ meet only through proto/ and this package; nothing here
imports edge, cloud, sim, bench or deploy (tests/test_layout.py holds it).
"""
