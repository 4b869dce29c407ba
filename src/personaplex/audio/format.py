"""The audio every stream of the model carries: 24 kHz mono, in 80 ms frames of 1920 samples
(Mimi's frame, and one Opus packet on the wire). One definition, imported everywhere."""

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1_920
