"""MAE pretraining driven by the EfficientTrain++ curriculum (model, targets, data, entry point)."""
