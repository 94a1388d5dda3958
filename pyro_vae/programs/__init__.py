"""Reading a model or guide program: its sites (from a trace), the model/guide pairing check, label use."""
