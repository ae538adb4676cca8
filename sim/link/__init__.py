"""link-sim: a userspace shaping TCP proxy that stands in for the edge–cloud link.

Layout (one job per module):
  config    the conditions of each direction and their validation
  shaper    pacing math: when may the next bytes leave (rate or trace), fake-clock testable
  trace     Mahimahi trace files
  profiles  named profiles from sim/link_profiles.toml
  channel   delay, jitter and TCP-style loss applied after the shaper
  direction one shared, bounded queue per direction drained by one task
  proxy     connections, byte pumps, outages
  commands  the one command grammar used by the control port, schedule files and MQTT
  control   control port server and client
  schedule  timed command files
  report    what was delivered, as JSON lines
  mqttctl   optional MQTT control topic
  timing    sub-millisecond asyncio timers (select() on the epoll fd)
  measure   measuring a link from outside: upstream test server, rate, RTT
  netns     optional cross-check with tc tbf inside network namespaces
  cli       the `link-sim` entry point
"""
