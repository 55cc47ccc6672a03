"""Getting outputs to the broker and offsets committed: publishing, the two committers, the in-flight budget."""
