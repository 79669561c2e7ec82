"""ttci/infra"""
