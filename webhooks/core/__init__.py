"""webhooks/core"""
