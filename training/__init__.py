"""Training pipeline: data, features, models, evaluation, registry."""
