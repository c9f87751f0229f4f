"""Adapting the generator to the classes and domains wanted: prompt augmentation (synonyms,
hyponyms, templates, several classes per prompt) and LoRA training of the denoiser."""
