"""Feature spaces: pooled and pixel descriptors, CNN encoders, self-supervised pretraining, the
dense cache, the map memory and the encode stage.
"""
