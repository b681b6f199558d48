"""Speed levers applied to a loaded engine: attention backend, compilation, graph capture. Switchable, measured."""
