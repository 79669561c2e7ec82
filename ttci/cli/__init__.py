"""ttci/cli"""
