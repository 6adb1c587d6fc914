"""The bottom floor: file I/O (``io``), array image operations (``image``), checkpoints (``checkpoint``),
pictures (``viz``), timing (``timing``) and option-file editing (``options``). Nothing here imports
from the rest of the plugin."""
