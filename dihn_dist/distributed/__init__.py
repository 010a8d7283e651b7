"""Everything that talks to torch.distributed (`comm`) and the process's share of the machine (`machine`),
so that the rest of the code never branches on rank."""
