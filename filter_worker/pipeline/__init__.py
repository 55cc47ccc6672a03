"""The classification steps a record passes through: decode, tokenize and batch, infer, route."""
