import logging

# Damage tests make VUA log warnings on purpose; assertLogs still sees them, the console not.
logging.getLogger("vua").addHandler(logging.NullHandler())
