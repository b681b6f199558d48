"""The engine: load once, generate many times. encode -> denoise -> decode, with hooks between phases."""
