"""Where eviction notices come from: one module per cloud, each a ``NoticeSource``."""
