"""Weighted k-NN classification on L2-normalised features (DINO's monitor): a label-free check of the encoder."""
import torch
import torch.nn.functional as F


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
    """Encoder cls features of a whole loader (model.extract_features), on the CPU, with labels."""
    features, labels = [], []
    for batch in loader:
        with amp_context():
            features.append(model.extract_features(batch[0].to(device, non_blocking=True)).float().cpu())
        labels.append(batch[1])
    return torch.cat(features), torch.cat(labels)
