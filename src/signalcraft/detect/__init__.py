"""Anomaly detection: one convolutional autoencoder per machine source scores how abnormal a log-mel tensor is."""
