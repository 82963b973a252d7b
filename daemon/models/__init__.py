"""The model store: Ollama-format names, manifests and blobs; the registry client; Modelfiles;
the embedded default model."""
