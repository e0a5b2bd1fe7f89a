"""regnet_zoo.data"""
