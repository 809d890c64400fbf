-- A second database on the same server: the sweeps' Optuna storage (MLflow has its own).
CREATE DATABASE optuna;
