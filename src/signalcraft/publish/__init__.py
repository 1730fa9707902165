"""Results to the plant's MQTT broker through a local outbox (docs/fleet.md).

- ``messages``: what is published, on which topic, with which stable message id; each
  message is queued in the detection state's outbox (``detect.store``) inside the
  transaction of the result it describes. No network here.
- ``mqtt``: sending the outbox with paho-mqtt, oldest first, each message marked sent
  only after the broker's acknowledgement; a broker that is down or refuses leaves the
  messages waiting and never fails the command that produced them.
"""
