"""ttci/model"""
