"""The model families. Importing a family's module registers it (see ``jaxspeech.model``)."""
