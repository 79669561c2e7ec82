"""ttci/client"""
