"""How good a model is: the `evaluate` job (ELBO, compression against PCA, few-label probes, anomaly
AUCs), the metrics and probes it shares with the protocols, and the bundled data
sets (scikit-learn's digits; 8,000 MNIST digits in data/ with their source and licence). It imports
pipeline.models, pipeline.table, pipeline.runtime and vae."""
