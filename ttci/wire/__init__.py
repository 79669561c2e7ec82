"""ttci/wire"""
