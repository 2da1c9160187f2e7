"""Weighted k-NN classification on L2-normalised features (DINO's monitor): a label-free check of the encoder."""
import torch
import torch.nn.functional as F

from util.dist import gather_shards


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, num_classes: int | None = None) -> torch.Tensor:
    """Predicted labels (M,) for test_features (M, D) from train_features (N, D).

    Each of the k nearest neighbours (cosine similarity s) votes for its class with weight exp(s / T).
    """
    num_classes = num_classes or int(train_labels.max()) + 1
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    similarity, index = (test @ train.T).topk(min(k, train.shape[0]), dim=1)
    weights = (similarity / temperature).exp()
    votes = torch.zeros(test.shape[0], num_classes, device=test.device)
    votes.scatter_add_(1, train_labels[index], weights)
    return votes.argmax(dim=1)


@torch.no_grad()
def extract_features(model, loader, device: torch.device, amp_context) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder cls features (model.extract_features) of a whole data set, on the CPU, with labels. Under several
    ranks the loader holds this rank's shard of an unshuffled DistributedSampler (util.run.make_loader): each rank
    encodes its shard and every rank gets all rows in the data set's order."""
    features, labels = [], []
    for batch in loader:
        with amp_context():
            features.append(model.extract_features(batch[0].to(device, non_blocking=True)).float().cpu())
        labels.append(batch[1])
    total = len(loader.dataset)
    return gather_shards(torch.cat(features), total), gather_shards(torch.cat(labels), total)
