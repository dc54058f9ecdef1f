"""Load testing against running servers, and the SLO target tables its verdicts (and the report's) use."""
