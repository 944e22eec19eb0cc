"""Analytics over the aggregates: figures, baselines, anomalies and monthly reports."""
